from libs.common.launch import service_main
from services.trainer import app

service_main(app)

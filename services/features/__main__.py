from libs.common.launch import service_main
from services.features import app

service_main(app)

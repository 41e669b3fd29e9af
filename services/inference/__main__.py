from libs.common.launch import service_main
from services.inference import app

service_main(app)
